"""From images to global descriptors: GeM pooling, backbone networks, extraction and data preparation."""
