"""Validation: compare two backends teacher-forced (verify = compare(reference, bundle)), perplexity scorers."""
