"""Pure model code: the two AniTalker stages, the DDIM sampler, audio front ends and checkpoint I/O."""
