"""The quantization algorithms the methods drive: scalar grids (RTN, GPTQ), the VQ engine (weighted
k-means, WCSG allocation, Fisher sensitivity, compensation) and the numerics they share."""
