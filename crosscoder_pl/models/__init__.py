"""Base/chat model pairs: loading and checking any pair, and building the embedded one."""
