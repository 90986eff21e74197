"""File formats: embeddings, LoRAs and A1111 bundles as every UI reads them, and conversion between them.

Nothing here knows how the weights were trained; tinv.trained writes through these modules.
"""
