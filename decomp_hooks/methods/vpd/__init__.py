"""VPD, adversarial parameter decomposition: SPD's components and causal importances, trained against persistent
adversarial masks, with a frequency penalty (docs/methods/vpd.md)."""
