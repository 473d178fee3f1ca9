"""Pure planners: observed state in, desired status and actions out."""
