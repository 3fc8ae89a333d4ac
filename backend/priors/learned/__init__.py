"""The learned reference prior: a small text-to-image diffusion model of the reference world.

A diffusers ``UNet2DConditionModel`` (pixel space, 32 px) with a small CLIP text encoder,
trained on the front-biased reference collections (:mod:`.train`), shipped as safetensors in
``weights/`` and run through :class:`distill3d.priors.stable_diffusion.StableDiffusionPrior`
(the Stable Diffusion code path: text states, classifier-free guidance, view-dependent
prompts, LoRA eps_psi), with an identity "VAE" (see :mod:`.prior`).
"""
