"""What tests and benchmarks share: servers (moto S3, Ray heads, a running app, the fake
cluster), stores written from generated or sample data, sample images and bad inputs.

Neither ``tests`` nor ``benchmarks`` imports the other; both import this. Nothing in the product
packages imports it.
"""
