"""The adapter itself: configuration, factor initialisers, the adapted layer, injection into a
model, quantized bases and several named adapters on one model. Imports nothing above it."""
