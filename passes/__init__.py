"""Graph -> graph rewrites and the pass manager (see the passes issue)."""
