"""edgekb: a knowledge-base question-answering appliance for small hardware."""

__version__ = "0.1.0"
