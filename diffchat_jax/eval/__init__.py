"""The evaluation (paper section 4.1, Tables 1 and 4): systems' target prompts rendered with SD models at fixed
seeds, scored by six metrics, summarised with the Avg. Rank (results.py)."""
