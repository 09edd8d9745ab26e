"""Full Bayes on the same model: `nuts` (NumPyro's NUTS), `svi` (variational inference, with the flow
guides of `svi_flows` and the amortized `encoder`)."""
