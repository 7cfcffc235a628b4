"""Small pieces the command-line scripts (train.py, test.py, demo.py) share."""


def one_paragraph(err, limit=4000):
    """An exception's message on one line (long key lists cut at ``limit`` characters)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."

