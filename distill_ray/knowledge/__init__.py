"""Symbolic knowledge K (SKIntern, NesyCD): its LanceDB table and offline sentence embeddings."""
