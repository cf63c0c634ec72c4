"""xai_lib: explainable audio-deepfake detection toolkit."""
__version__ = "0.1.0"
