"""What Outlast is compared with: one module per baseline, each the least code doing the same work."""
