"""The offline demo: tiny random CLIP towers built from configs (`tiny_clip`), its drawn data set (`synthetic`), and
`mst-clipiqa demo` (`run`). Not imported by the rest of the package."""
