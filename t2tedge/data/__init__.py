"""Datasets (image folder, file list, bundled Fashion-MNIST) and eval transforms."""
