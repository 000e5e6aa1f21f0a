"""Container indexes read with HTTP Range: where each sample of a track is.

Each module reads one family of containers (``mp4``: progressive and
fragmented MP4; ``webm``: WebM/Matroska) through a byte-range reader and
describes its tracks and samples in the shapes of :mod:`.base`, so the cut
engine never needs FFmpeg's demuxer to find, fetch or time a sample.
"""
