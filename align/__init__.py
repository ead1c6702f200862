"""pickalign.align: fine-tuning SD 1.x/2.x and SDXL UNets toward preferences (Diffusion-DPO,
DDPO, reward-weighted and best-of-n distillation) and best-of-n ranking at inference."""
