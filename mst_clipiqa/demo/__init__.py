"""The offline demo and stand-ins: random CLIP towers built from configs (`tiny_clip`), drawn images in the
releases' layouts (`synthetic`), and `mst-clipiqa demo` (`run`). Not imported by the rest of the package."""
