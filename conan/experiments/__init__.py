"""Experiments over the training stages on Ray Tune: the soft-mask sweep (Table 12) and the ablation (Table 4)."""
