"""imgclf: a folder of labelled images → a transfer-learned, evaluated, saved classifier."""

from imgclf._version import __version__


def __getattr__(name):  # lazy: `import imgclf` stays cheap for the CLI's --help
    if name == "ImageClassifier":
        from imgclf.train.classifier import ImageClassifier

        return ImageClassifier
    raise AttributeError(name)


__all__ = ["ImageClassifier", "__version__"]
