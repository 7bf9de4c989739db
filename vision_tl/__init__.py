"""vision_tl: transfer learning for inspection imagery.

The package root imports nothing heavy, so that ``vision_tl.deploy`` can run on
a line PC without torch. Import the pieces you need::

    from vision_tl.backbones import create_backbone
    from vision_tl.data import ImageFolderDataModule
    from vision_tl.tasks import ImageClassifier
"""

__version__ = "0.1.0"
