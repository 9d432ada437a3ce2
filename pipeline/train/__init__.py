"""Training: the loop, the two-pass step, optimiser and schedule, validation, step metrics and timing.

May import eval, data, tracking, parallel, models, losses, config and the foundation."""
