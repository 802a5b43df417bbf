"""Tools: graft, export and push, model cards, evaluation, plots, the demo, and the helpers they share."""
