// Expand or collapse every fork tree and token view at once; the page works without this script too.
document.querySelectorAll("button[data-details]").forEach(function (button) {
  button.addEventListener("click", function () {
    var open = button.getAttribute("data-details") === "open";
    document.querySelectorAll("details").forEach(function (d) { d.open = open; });
  });
});
// Scroll each aligned token view so its diverging token sits in view, a little left of the middle (on narrow
// columns the window around the fork is wider than the column). Again on resize: the columns change width.
function showForks() {
  document.querySelectorAll(".tv-scroll").forEach(function (box) {
    var tok = box.querySelector(".tok.div");
    if (!tok) { return; }
    var left = tok.getBoundingClientRect().left - box.getBoundingClientRect().left + box.scrollLeft;
    box.scrollLeft = Math.max(0, left - box.clientWidth * 0.4);
  });
}
showForks();
window.addEventListener("resize", showForks);
document.querySelectorAll("details.tokens").forEach(function (d) { d.addEventListener("toggle", showForks); });
