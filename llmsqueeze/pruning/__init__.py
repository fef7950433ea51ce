"""Pruning: masks (masks.py), one module per criterion (magnitude, wanda, sparsegpt, saliency),
structured MLP-channel removal (structured.py), iterative schedules (iterative.py)."""
