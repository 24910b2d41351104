"""cddpm_lib — reproduction kit for *Guided Reconstruction with Conditioned Diffusion Models for Unsupervised
Anomaly Detection in Brain MRIs* (Behrendt et al. 2023).

One flat module per concept; the numbered notebooks in ``notebooks/`` call these modules and nothing else.
See ``docs/ARCHITECTURE.md`` for the modules, the files each stage hands to the next and the model interface.
"""
__version__ = "0.1.0"
