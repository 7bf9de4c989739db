"""Figures and reports from evaluation results."""

from vision_tl.reports.plots import plot_confusion_matrix

__all__ = ["plot_confusion_matrix"]
