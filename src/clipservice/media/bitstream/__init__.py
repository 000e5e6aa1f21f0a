"""Codec bitstream surgery: parameter sets and slice headers read and rewritten bit-exactly."""
