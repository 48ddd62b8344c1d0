"""Data sets: the offline Fashion-MNIST demo and ImageFolder trees."""
