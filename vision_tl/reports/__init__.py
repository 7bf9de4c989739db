"""Figures and reports from evaluation results.

``metrics`` (numpy only), ``plots`` (matplotlib), ``html`` (the self-contained page),
``report`` (``vision-tl report``), ``compare`` and ``explain`` (Grad-CAM).
"""

from vision_tl.reports.metrics import evaluate, select_threshold
from vision_tl.reports.plots import plot_confusion_matrix

__all__ = ["evaluate", "plot_confusion_matrix", "select_threshold"]
