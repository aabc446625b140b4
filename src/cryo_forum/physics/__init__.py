"""Image formation: the Fourier grid, the CTF, central slices and their adjoint, the renderer."""
