"""Cost models: layer terms and their formulas, target bytes and memory levels, latency models, the `Costs`
value type and the metric registry constraints are written against."""
