"""clipservice: cut clips out of online videos with FFmpeg, over HTTP."""

__version__ = "0.1.0"
