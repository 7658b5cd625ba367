"""Hub Space page for the metric: shows the metric card.

evaluate's usual ``launch_gradio_widget`` builds a form from the input features, but this metric also needs a
model object, which a form cannot provide, so the Space only documents it. Not imported by hfvolume or evaluate.
"""
import os

import gradio as gr

_HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(_HERE, "README.md"), encoding="utf-8") as f:
    # The YAML front matter is Space metadata, not page text.
    _card = f.read().split("---", 2)[-1]

with gr.Blocks(title="Local Volume") as demo:
    gr.Markdown(_card)

if __name__ == "__main__":
    demo.launch()
