"""Functional ops. One file per op: its kernels, launcher, custom op and autograd."""
