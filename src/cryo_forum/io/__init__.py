"""Particle file formats (RELION STAR, MRC/MRCS, cryoSPARC .cs) and the lazy ParticleSet built from them."""
