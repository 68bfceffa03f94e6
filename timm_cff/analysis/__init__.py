"""Layer-wise analysis of a locally trained model (CFF paper, Sec. 4.2 / Fig. 5): watch each block learn.

Because every CFF block has its own loss, each block's pooled output can be judged on its own: Fisher's criterion
(Eqs. 19-22), a closed-form linear probe (LDA), the clamped fraction R(k) of the marginal loss, anchor cosines,
t-SNE maps and the run's per-block training curves. ``analyze(model, loader, out_dir=...)`` writes all of it as
``report.md`` + ``metrics.json`` + PNGs; the functions below return plain dicts and tensors for notebooks. Only the
pictures need the ``plot`` extra (matplotlib, scikit-learn), and those are imported when drawing.
"""
from .features import block_outputs as block_outputs
from .features import extract_block_features as extract_block_features
from .fisher import fisher_criterion as fisher_criterion
from .fisher import scatter_matrices as scatter_matrices
from .history import block_series as block_series
from .history import read_history as read_history
from .layerwise import layerwise_metrics as layerwise_metrics
from .layerwise import separable_block as separable_block
from .layerwise import tsne_embeddings as tsne_embeddings
from .pairs import anchor_similarity as anchor_similarity
from .pairs import clamped_fraction as clamped_fraction
from .pairs import clamped_fraction_metric as clamped_fraction_metric
from .plots import PLOT_INSTALL_HINT as PLOT_INSTALL_HINT
from .plots import missing_plot_packages as missing_plot_packages
from .plots import plot_clamped_curves as plot_clamped_curves
from .plots import plot_depth_metrics as plot_depth_metrics
from .plots import plot_training_curves as plot_training_curves
from .plots import plot_tsne as plot_tsne
from .lda import fit_linear_discriminant as fit_linear_discriminant
from .lda import linear_probe_accuracy as linear_probe_accuracy
from .report import analyze as analyze
from .report import write_report as write_report

__all__ = [
    'block_outputs', 'extract_block_features', 'fisher_criterion', 'scatter_matrices', 'block_series',
    'read_history', 'layerwise_metrics', 'separable_block', 'tsne_embeddings', 'anchor_similarity',
    'clamped_fraction', 'clamped_fraction_metric', 'PLOT_INSTALL_HINT', 'missing_plot_packages',
    'plot_clamped_curves', 'plot_depth_metrics', 'plot_training_curves', 'plot_tsne', 'fit_linear_discriminant',
    'linear_probe_accuracy', 'analyze', 'write_report',
]
