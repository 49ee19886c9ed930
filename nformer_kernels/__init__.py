"""nformer_kernels: fused O(N*k) kernels and modules for NFormer (CVPR 2022)."""
from nformer_kernels._extension import extension_available
