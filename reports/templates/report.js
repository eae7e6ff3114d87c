// Expand or collapse every fork tree and token view at once; the page works without this script too.
document.querySelectorAll("button[data-details]").forEach(function (button) {
  button.addEventListener("click", function () {
    var open = button.getAttribute("data-details") === "open";
    document.querySelectorAll("details").forEach(function (d) { d.open = open; });
  });
});
