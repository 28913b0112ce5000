"""GPU post-processing: CLIP similarity filtering, NSFW and watermark tags, embeddings."""
