"""cardiac-synth pipeline: ingest, train, generate, filter, evaluate, export."""

__version__ = "0.1.0"
