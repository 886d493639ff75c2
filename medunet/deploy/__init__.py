"""Deployment: a trained run as a folder that segments whole volumes with onnxruntime, numpy and nibabel only
(:mod:`medunet.deploy.export`, the runner :mod:`medunet.deploy.runner`), and whole-volume memory planning
(:mod:`medunet.deploy.memory`)."""

from medunet.deploy.export import DeployExport, deploy_plan, export_deploy

__all__ = ["DeployExport", "deploy_plan", "export_deploy"]
