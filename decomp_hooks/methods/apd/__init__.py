"""Attribution-based Parameter Decomposition: components spanning every site, chosen per input by the top-k of
their attributions (docs/methods/apd.md)."""
