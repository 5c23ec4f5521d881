"""imgclf: a folder of labelled images → a transfer-learned, evaluated, saved classifier."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import imgclf` stays cheap for the CLI's --help
    if name == "ImageClassifier":
        from imgclf.api import ImageClassifier

        return ImageClassifier
    raise AttributeError(name)


__all__ = ["ImageClassifier", "__version__"]
