"""Retrieval: embeddings, document parsing/chunking, the Chroma knowledge base, prompt context."""
