"""The text side of DiffChat: keywords (POS tags, WordNet lemmas and synonyms), content integrity (the CI score and
the prefix CI for VCI), ADM pi- keyword plans, and the installer of the NLTK data they need (nltk_data)."""
