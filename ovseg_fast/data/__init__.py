"""Datasets: readers of the standard folder layouts, unlabeled images with masks, the synthetic
``shapes`` dataset, and the joint image/mask augmentation. Imports nothing else of ovseg_fast."""
