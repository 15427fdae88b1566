"""Where images go: the store interface, the local folder and S3 stores, the image codec."""
